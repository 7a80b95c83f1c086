// Glibc's Swift module first, as in the other C modules: the library
// header then reuses its glibc declarations.
#pragma clang module import SwiftGlibc
#include <blkid/blkid.h>
