// devpipe — the whole public API in one include.
#pragma once

#include "devpipe/config.h"
#include "devpipe/device.h"
#include "devpipe/dtype.h"
#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "devpipe/graph.h"
#include "devpipe/model_wrapper.h"
#include "devpipe/nn.h"
#include "devpipe/ranked.h"
#include "devpipe/safetensors.h"
#include "devpipe/shape.h"
#include "devpipe/stats.h"
#include "devpipe/tensor.h"
#include "devpipe/trace.h"
#include "devpipe/version.h"
#include "devpipe/world.h"
