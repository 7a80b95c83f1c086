@testable import Mirror

/// What a leg holds, read at a start: a superblock slot (any 4 KiB), the
/// layout it names, and the bitmap of that layout, from the bytes after it.
/// The first byte says whether the slot's checksum is made right first:
/// a mutated slot almost never has one, and the fields after it would
/// never be read.
enum MetadataInput {
    static func superblock(_ bytes: UnsafeRawBufferPointer) {
        guard let first = bytes.first else { return }
        var slot = Array(bytes.dropFirst().prefix(MirrorLayout.slotBytes))
        slot += [UInt8](repeating: 0, count: MirrorLayout.slotBytes - slot.count)
        if first & 1 != 0 {
            let checksum = crc32c(slot[0..<MirrorLayout.slotBytes - 4])
            slot.replaceSubrange(MirrorLayout.slotBytes - 4..<MirrorLayout.slotBytes,
                                 with: withUnsafeBytes(of: checksum.littleEndian, Array.init))
        }
        guard case .superblock(let superblock) = Superblock.decode(slot),
              let layout = try? MirrorLayout(validating: superblock) else { return }
        // What a start does with a superblock it takes: encode it again, and
        // read a bitmap of its size.
        guard case .superblock(let again) = Superblock.decode(superblock.encoded()), again == superblock else {
            fatalError("a superblock does not read back as it was written: \(superblock)")
        }
        // As a start reads it: the layout's whole bitmap (the input's bytes,
        // then zeroes), unless it is too large to hold here.
        guard layout.bitmapBytes <= 1 << 20 else { return }
        var bitmapBytes = Array(bytes.dropFirst(1 + MirrorLayout.slotBytes).prefix(Int(layout.bitmapBytes)))
        bitmapBytes += [UInt8](repeating: 0, count: Int(layout.bitmapBytes) - bitmapBytes.count)
        let bitmap = RegionBitmap(regionCount: layout.regionCount, bitmap: bitmapBytes)
        _ = bitmap.dirtyCount
        _ = bitmap.image(bitmapBytes: layout.bitmapBytes)
    }
}
