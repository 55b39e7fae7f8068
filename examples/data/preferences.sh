#!/bin/sh
# preferences.sh - `make data-preferences`: the HH-RLHF test splits and AlpacaEval judgements the
# reward examples read, from their public homes, into data/preferences/.
#
#   sh examples/data/preferences.sh [OUT]              default OUT: data/preferences
#   sh examples/data/preferences.sh --from DIR [OUT]   the same files from a local folder of this
#                                                      layout (an offline copy), with the same checks
#
# Every file of examples/data/preferences.list is downloaded (curl, else wget; the listed URLs in
# order), its sha256 checked, stored (xz-compressed where the list says .xz) under a temporary
# name beside its place and renamed into place: nothing half-written is left, and a file that is
# already there with its checksum is kept (a second run does nothing). When the hosts cannot be
# reached it says so in one line and exits 0: the examples then read the same files from
# $MOE_SHARED_DATA or ../shared/data where those exist. A checksum that does not match fails.
set -eu

cd "$(dirname "$0")/../.."
LIST=examples/data/preferences.list
FROM=""
if [ "${1:-}" = "--from" ]; then
    [ $# -ge 2 ] || { echo "data-preferences: --from needs a folder" >&2; exit 2; }
    FROM=${2%/}
    shift 2
fi
OUT=${1:-data/preferences}
OUT=${OUT%/}

say() { echo "data-preferences: $*"; }
die() { echo "data-preferences: $*" >&2; exit 1; }

if command -v sha256sum >/dev/null 2>&1; then
    sha256() { sha256sum | cut -c1-64; }
elif command -v shasum >/dev/null 2>&1; then
    sha256() { shasum -a 256 | cut -c1-64; }
else
    die "neither sha256sum nor shasum found (Debian: apt-get install coreutils)"
fi
command -v xz >/dev/null 2>&1 || die "xz is missing (Debian: apt-get install xz-utils)"

# the sha256 of what the list describes for FILE stored as PATH: the plain bytes (decompressed
# for a stored .xz)
digest() {
    case "$2" in
    *.xz) xz -dc "$1" 2>/dev/null | sha256 ;;
    *) sha256 < "$1" ;;
    esac
}

# fetch URL into FILE; the tool's exit status
fetch() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 2 --connect-timeout 20 --max-time 600 -o "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then
        wget -q --timeout=20 --tries=3 -O "$2" "$1"
    else
        return 127
    fi
}

if [ -z "$FROM" ]; then
    if ! command -v curl >/dev/null 2>&1 && ! command -v wget >/dev/null 2>&1; then
        say "neither curl nor wget is installed (Debian: apt-get install curl); the examples read \$MOE_SHARED_DATA or ../shared/data instead"
        exit 0
    fi
    probe=$(mktemp)
    if ! fetch "https://raw.githubusercontent.com/anthropics/hh-rlhf/354e5c3cb8960630860dd5774a6ac2a58313bf4d/LICENSE" "$probe" 2>/dev/null; then
        rm -f "$probe"
        say "raw.githubusercontent.com cannot be reached from here; nothing downloaded (the examples read \$MOE_SHARED_DATA or ../shared/data instead)"
        exit 0
    fi
    rm -f "$probe"
fi

# LICENSE files last: files_data_root() takes data/ as complete when hh-rlhf/LICENSE is there
for pass in data licences; do
    grep -v '^#' "$LIST" | grep . | while read -r sum path urls; do
        case "$path" in
        */LICENSE*) [ "$pass" = licences ] || continue ;;
        *) [ "$pass" = data ] || continue ;;
        esac
        dest="$OUT/$path"
        if [ -f "$dest" ] && [ "$(digest "$dest" "$path")" = "$sum" ]; then
            continue
        fi
        mkdir -p "$(dirname "$dest")"
        tmp="$dest.part.$$"
        ok=0
        if [ -n "$FROM" ]; then
            if [ -f "$FROM/$path" ] && cp "$FROM/$path" "$tmp" && [ "$(digest "$tmp" "$path")" = "$sum" ]; then ok=1; fi
            [ "$ok" -eq 1 ] || { rm -f "$tmp"; die "$FROM/$path is missing or its sha256 is not $sum"; }
        else
            for url in $urls; do
                if fetch "$url" "$tmp.dl" && [ "$(sha256 < "$tmp.dl")" = "$sum" ]; then
                    case "$path" in
                    *.xz) xz -9 -c "$tmp.dl" > "$tmp" && rm -f "$tmp.dl" ;;
                    *) mv "$tmp.dl" "$tmp" ;;
                    esac
                    ok=1
                    break
                fi
                rm -f "$tmp.dl"
            done
            [ "$ok" -eq 1 ] || { rm -f "$tmp"; die "$path: no URL gave the file with sha256 $sum (tried: $urls)"; }
        fi
        mv "$tmp" "$dest"
        echo "data-preferences: $dest"
    done
done
n=$(grep -v '^#' "$LIST" | grep -c .)
say "$OUT holds the $n files of $LIST, each with its sha256"
