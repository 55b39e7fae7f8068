#!/bin/sh
# test_data_preferences.sh - `make data-preferences`'s script without the network: from a local
# copy of the files (the shared data folder, skipped when absent) into a fresh folder: every file
# arrives with its checksum, a second run changes nothing, a damaged source fails with a sentence
# and leaves neither a partial file nor a changed one behind.
root=${MOE_SHARED_DATA:-../shared/data}
passed=0
failed=0
check() { # $1 = 0 when it held, $2 = what
    if [ "$1" -eq 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $2"; fi
}
if [ ! -f "$root/preferences/hh-rlhf/LICENSE" ]; then
    echo "SKIP data-preferences: no shared data folder at $root (set MOE_SHARED_DATA)"
    echo "0 passed, 0 failed"
    exit 0
fi
t=${BUILD:-build}/tests/data_preferences
rm -rf "$t"
mkdir -p "$t"
out=$(sh examples/data/preferences.sh --from "$root/preferences" "$t/a" 2>&1)
check $? "a copy from $root/preferences: $out"
n=$(grep -v '^#' examples/data/preferences.list | grep -c .)
have=$(find "$t/a" -type f | wc -l)
[ "$have" -eq "$n" ]; check $? "$n files listed, $have written"
sum_before=$(cd "$t/a" && find . -type f -exec cat {} + | cksum)
out=$(sh examples/data/preferences.sh --from "$root/preferences" "$t/a" 2>&1)
check $? "second run: $out"
echo "$out" | grep -q "holds the $n files" && ! echo "$out" | grep -q "^data-preferences: $t/a/"
check $? "a second run rewrites nothing: $out"
# a source whose AlpacaEval file 3 is damaged
mkdir -p "$t/bad"
cp -R "$t/a/." "$t/bad/"
chmod -R u+w "$t/bad"
printf 'not xz' > "$t/bad/alpacaeval-bon-tulu2-13b/tulu-2-dpo-13b.3.annotations.json.xz"
cp -R "$t/a/." "$t/c/" 2>/dev/null || { mkdir -p "$t/c" && cp -R "$t/a/." "$t/c/"; }
chmod -R u+w "$t/c"
rm -f "$t/c/alpacaeval-bon-tulu2-13b/tulu-2-dpo-13b.3.annotations.json.xz" "$t/c/hh-rlhf/LICENSE"
out=$(sh examples/data/preferences.sh --from "$t/bad" "$t/c" 2>&1)
rc=$?
[ "$rc" -ne 0 ] && echo "$out" | grep -q "tulu-2-dpo-13b.3.annotations.json.xz is missing or its sha256 is not"
check $? "a damaged source fails with a sentence (rc $rc): $out"
[ -z "$(find "$t/c" -name '*.part.*')" ] && [ ! -e "$t/c/alpacaeval-bon-tulu2-13b/tulu-2-dpo-13b.3.annotations.json.xz" ] && [ ! -e "$t/c/hh-rlhf/LICENSE" ]
check $? "no partial file, and the folder is not marked complete (no hh-rlhf/LICENSE)"
rm -rf "$t"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
