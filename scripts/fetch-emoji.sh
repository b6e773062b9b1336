#!/usr/bin/env bash
# Fetches Twemoji's 64x64 PNGs (npm's emoji-datasource-twitter@16.0.0; graphics by Twitter, Inc and other
# contributors, CC-BY 4.0) into DIR (default data/emoji), one folder per category of the package's
# emoji.json (Activities, Animals & Nature, Flags, Food & Drink, Objects, People & Body, Smileys &
# Emotion, Symbols, Travel & Places), skin-tone variations with their emoji. The "Component" category
# (skin-tone swatches and hair parts, not emoji) is left out. The package's SHA-256 is verified. Does
# nothing when DIR already holds the images.
set -euo pipefail
dir=${1:-data/emoji}
package=emoji-datasource-twitter@16.0.0
sha256=f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877
expected=3781  # the package's 3,786 images less the 5 components

if [ -f "$dir/.complete" ]; then
  echo "fetch-emoji: $dir already holds the emoji ($(cat "$dir/.complete") images)"
  exit 0
fi
command -v npm >/dev/null || { echo "fetch-emoji: needs npm (apt-get install npm)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "fetch-emoji: needs python3" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-emoji: npm pack $package"
(cd "$tmp" && npm pack --silent "$package" >/dev/null)
tgz=$(ls "$tmp"/*.tgz)
actual=$(sha256sum "$tgz" | cut -d' ' -f1)
if [ "$actual" != "$sha256" ]; then
  echo "fetch-emoji: $package: SHA-256 $actual, expected $sha256" >&2
  exit 1
fi
tar xzf "$tgz" -C "$tmp" package/emoji.json package/img/twitter/64
rm -rf "$dir"
mkdir -p "$dir"
# Each image into its category's folder, by emoji.json (its skin-tone variations with it).
count=$(python3 - "$tmp/package" "$dir" <<'EOF'
import json, os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
n = 0
for emoji in json.load(open(os.path.join(src, "emoji.json"))):
    if emoji["category"] == "Component":
        continue
    images = [emoji] + list((emoji.get("skin_variations") or {}).values())
    for image in images:
        if not image.get("has_img_twitter"):
            continue
        folder = os.path.join(dst, emoji["category"])
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(os.path.join(src, "img", "twitter", "64", image["image"]), os.path.join(folder, image["image"]))
        n += 1
print(n)
EOF
)
if [ "$count" != "$expected" ]; then
  echo "fetch-emoji: copied $count images, expected $expected" >&2
  exit 1
fi
echo "$count" > "$dir/.complete"
echo "fetch-emoji: $count Twemoji images (CC-BY 4.0) in $dir, $(ls "$dir" | wc -l) categories"
