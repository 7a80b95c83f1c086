@testable import Mirror

/// What a leg holds, read at a start: a superblock slot (any 4 KiB), the
/// layout it names, and the bitmap of that layout, from the bytes after it.
enum MetadataInput {
    static func superblock(_ bytes: UnsafeRawBufferPointer) {
        let slot = Array(bytes.prefix(MirrorLayout.slotBytes))
        guard case .superblock(let superblock) = Superblock.decode(slot + [UInt8](repeating: 0, count: max(0, MirrorLayout.slotBytes - slot.count))),
              let layout = try? MirrorLayout(validating: superblock) else { return }
        // What a start does with a superblock it takes: encode it again, and
        // read a bitmap of its size.
        guard case .superblock(let again) = Superblock.decode(superblock.encoded()), again == superblock else {
            fatalError("a superblock does not read back as it was written: \(superblock)")
        }
        let bitmapBytes = Array(bytes.dropFirst(MirrorLayout.slotBytes).prefix(Int(min(layout.bitmapBytes, 1 << 16))))
        let bitmap = RegionBitmap(regionCount: layout.regionCount, bitmap: bitmapBytes)
        _ = bitmap.dirtyCount
        _ = bitmap.image(bitmapBytes: layout.bitmapBytes)
    }
}
