// Memory sizes as users write them (--budget, "budget_gib", and any other GiB option): a plain number is GiB;
// units, case-insensitive, with or without a space: GiB, MiB, TiB (powers of 1024) and GB, MB, TB (powers of 1000:
// "48GB" is 48e9 bytes = 44.70 GiB). A bare "G"/"M"/"T" is refused as ambiguous. Torch-free.
#pragma once
#include <string>

namespace mmoc {

// The size in GiB. Throws InputError naming `field` (e.g. "--budget", "job.json: key 'budget_gib'") for anything
// else: empty, negative, not finite, an unknown unit, trailing text.
double parse_gib(const std::string& text, const std::string& field);

}  // namespace mmoc
