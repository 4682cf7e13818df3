// The stage layout lives in arch/layout.hpp (torch-free, shared with the compiler); the engine's names for it.
#pragma once
#include "arch/layout.hpp"

namespace mmoc::engine {
using arch::embedding_name;
using arch::full_layout;
using arch::head_needs_embedding;
using arch::kParamAlign;
using arch::model_param_names;
using arch::ParamInfo;
using arch::ParamKind;
using arch::Role;
using arch::stage_layout;
using arch::stage_layouts;
using arch::StageLayout;
}  // namespace mmoc::engine
