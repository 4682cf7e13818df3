#!/bin/sh
# Screenshot of an mmoc-viz page with headless Chromium (no network needed).
#   tools/viz/screenshot.sh page.html out.png [WIDTH,HEIGHT]
set -eu
[ $# -ge 2 ] || { echo "usage: $0 page.html out.png [WIDTH,HEIGHT]" >&2; exit 2; }
page=$1 out=$2 size=${3:-1600,1000}
[ -f "$page" ] || { echo "$0: '$page': no such file" >&2; exit 2; }
chrome=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$chrome" ] || { echo "$0: chromium not found (apt-get install chromium)" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
abs=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")
"$chrome" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
  --virtual-time-budget=3000 --window-size="$size" --screenshot="$out" "file://$abs" 2>/dev/null
[ -s "$out" ] || { echo "$0: no screenshot written" >&2; exit 1; }
echo "$out"
