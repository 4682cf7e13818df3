// doctest in a test that also includes LibTorch: LibTorch's logging defines glog-style CHECK macros, and doctest's
// must win. Include this after every LibTorch header of the test file, instead of <doctest/doctest.h>.
#pragma once
#include <ATen/ATen.h>
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
#include <doctest/doctest.h>
