import Foundation
import PackagePlugin

/// Records the commit a build was made from (`dmio-nbd --version`): a
/// Swift file with `buildCommit`, rewritten only when the commit changes,
/// so that an unchanged tree does not rebuild.
@main
struct BuildInfo: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let folder = context.pluginWorkDirectoryURL.appending(path: "Generated")
        let script = #"""
            commit=$(git -C "$1" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
            if [ "$commit" != unknown ] && [ -n "$(git -C "$1" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
                commit="$commit with changes"
            fi
            mkdir -p "$2"
            line="let buildCommit = \"$commit\""
            [ "$(cat "$2/BuildCommit.swift" 2>/dev/null)" = "$line" ] || printf '%s\n' "$line" > "$2/BuildCommit.swift"
            """#
        return [.prebuildCommand(
            displayName: "Recording the commit of \(target.name)",
            executable: URL(fileURLWithPath: "/bin/sh"),
            arguments: ["-c", script, "build-info", context.package.directoryURL.path, folder.path],
            outputFilesDirectory: folder)]
    }
}
