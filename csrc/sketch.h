// Internal: the streaming sketch route (entry points in core.cpp).
#pragma once

#include "blas.h"
#include "flexlora/core.h"

namespace flexlora::detail {

void check_sketch_tests(const SketchTests& t);
void sketch_update_one(const SketchTests& t, SketchState& st, const FactorSet& f);
void sketch_finalize_one(const SketchFinalize& task, SvdOutput& out);

}  // namespace flexlora::detail
