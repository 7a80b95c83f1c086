// Glibc's Swift module first: the library header then reuses its glibc
// declarations instead of defining its own copies (fd_set, for one), which
// would clash in any Swift file that also imports Glibc.
#pragma clang module import SwiftGlibc
#include <libnbd.h>
