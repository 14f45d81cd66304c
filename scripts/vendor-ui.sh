#!/bin/sh
# Bundles the dashboard's front-end dependencies (noVNC) from the npm
# registry into internal/ui/static/vendor/, which is committed: the vigil
# binary embeds it and downloads nothing at run time, and a build needs no
# npm. Run it after changing ui/package.json; the versions are pinned in
# ui/package-lock.json (npm ci installs exactly those).
set -eu
cd "$(dirname "$0")/../ui"
npm ci --no-audit --no-fund
out=../internal/ui/static/vendor
mkdir -p "$out"
# One ES module, minified: the page imports it only when a screen is opened.
node_modules/.bin/esbuild novnc-entry.js --bundle --format=esm --minify --target=es2022 \
	--legal-comments=none --outfile="$out/novnc.js"
cp node_modules/@novnc/novnc/LICENSE.txt "$out/novnc.LICENSE.txt"
version=$(node -p 'require("./node_modules/@novnc/novnc/package.json").version')
printf 'noVNC %s (MPL-2.0, https://github.com/novnc/noVNC), bundled by scripts/vendor-ui.sh from ui/package-lock.json\n' "$version" > "$out/README"
echo "vendored noVNC $version into $out ($(wc -c < "$out/novnc.js") bytes)"
