// The one function is inline in the header; SwiftPM builds a C target from at least one file.
#include "cprefetch.h"
