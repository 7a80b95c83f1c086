#!/usr/bin/env bash
# A two-leg mirror over two loop devices, served over NBD on a unix socket.
# Needs root (losetup). Everything it makes is removed when it exits.
#
#   sudo examples/mirror-over-loop-devices.sh
#   sudo DMIO_NBD=/path/to/dmio-nbd examples/mirror-over-loop-devices.sh
set -euo pipefail

DMIO_NBD=${DMIO_NBD:-$(dirname "$0")/../.build/debug/dmio-nbd}
work=$(mktemp -d /tmp/dmio-example.XXXXXX)
socket=$work/nbd.sock
uri="nbd+unix:///?socket=$socket"
loops=()
server=

cleanup() {
    set +e   # undo everything, even if one part fails
    [[ -n $server ]] && kill "$server" && wait "$server"
    for loop in "${loops[@]}"; do losetup -d "$loop"; done
    rm -rf "$work"
}
trap cleanup EXIT

wait_for_socket() {   # $1 = socket, $2 = the pid that should make it
    until [[ -S $1 ]]; do
        kill -0 "$2" 2>/dev/null || { echo "the server exited; see $work/server.log" >&2; exit 1; }
        sleep 0.1
    done
}

echo "== two sparse 256 MiB files, one loop device on each"
truncate -s 256M "$work/leg0.img" "$work/leg1.img"
for image in "$work/leg0.img" "$work/leg1.img"; do loops+=("$(losetup -f --show "$image")"); done
echo "legs: ${loops[*]}"

echo "== create the mirror"
# Its metadata takes the first MiB of each leg. Both legs are all zeroes,
# so they already agree: --assume-clean skips copying leg 0 onto leg 1.
"$DMIO_NBD" create --assume-clean "${loops[@]}"

echo "== serve it on $socket"
"$DMIO_NBD" serve --socket "$socket" "${loops[@]}" 2>"$work/server.log" &
server=$!
wait_for_socket "$socket" "$server"
# One MiB less than a leg: the mirror's data starts after its metadata.
echo "export size: $(nbdinfo --size "$uri") bytes"

echo "== write 8 MiB through NBD and read it back"
qemu-io -f raw "$uri" -c 'write -P 0x5a 0 8M' -c 'read -P 0x5a 0 8M'

echo "== status"
# First line as dmsetup prints a mirror: legs, in-sync/total regions, and
# one letter per leg (A alive). Then a table of the legs; "dirty" counts the
# regions written in the last few seconds (their bits are cleared lazily).
"$DMIO_NBD" status --socket "$socket"

echo "== stop the server (SIGTERM flushes and marks the mirror clean)"
kill "$server"
wait "$server"
server=
cat "$work/server.log"

echo "== both legs hold the same data past their first MiB"
cmp -i 1048576 "${loops[@]}" && echo "identical"
