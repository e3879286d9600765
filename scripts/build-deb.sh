#!/usr/bin/env bash
# Builds the Debian package vzdump-hook_*_all.deb from this checkout (its files as they are, new ones
# included, ignored ones not; or from an unpacked source tree) with Debian's tooling (debhelper, dh-python/pybuild) in a temporary copy;
# prints the path of the .deb. Needs: apt-get install debhelper dh-python pybuild-plugin-pyproject
# python3-all python3-setuptools python3-click (scripts/setup-test-host.sh installs them).
#   scripts/build-deb.sh [OUTDIR [VERSION]]   OUTDIR: default ./dist; VERSION: default debian/changelog's
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)
version=${2:-}
work=$(mktemp -d /tmp/vzdh-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/vzdump-hook"
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$src" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) 2>/dev/null \
    | tar -C "$work/vzdump-hook" -xf -
else  # an unpacked source tree
  tar -C "$src" --exclude=./.venv --exclude=./dist --exclude=./.git -cf - . | tar -C "$work/vzdump-hook" -xf -
fi
cd "$work/vzdump-hook"
if [ -n "$version" ]; then
  # a build of another version (tests: an upgrade): a changelog entry on top
  { printf 'vzdump-hook (%s) UNRELEASED; urgency=medium\n\n  * Build of %s by scripts/build-deb.sh.\n\n' "$version" "$version"
    printf ' -- vzdump-hook developers <vzdump-hook@users.noreply.github.com>  %s\n\n' "$(date -R)"
    cat debian/changelog; } > debian/changelog.new
  mv debian/changelog.new debian/changelog
fi
# Debian's own python3 and tools, not a python3 that PATH may find first (pyenv, a venv)
PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; echo "build-deb.sh: dpkg-buildpackage failed" >&2; exit 1; }
deb=$(ls "$work"/vzdump-hook_*_all.deb)
cp "$deb" "$out/"
echo "$out/$(basename "$deb")"
