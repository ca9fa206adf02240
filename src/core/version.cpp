#include "devpipe/version.h"

namespace devpipe {

const char* version() { return DEVPIPE_VERSION_STRING; }

}  // namespace devpipe
