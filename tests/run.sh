#!/bin/sh
# Runs the test programs given as arguments (and, with --matrix, the build matrix first),
# adds up their "N passed, N failed" lines and ends with the suite's own such line.
# A program that crashes or exits non-zero without reporting a failure counts as one failure.
# spinning OpenMP threads stall when other jobs share the cores
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

count() { # $1 = output file, $2 = exit code, $3 = name
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n 1)
    p=$(echo "$line" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed.*/\1/p')
    f=$(echo "$line" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed.*/\2/p')
    [ -z "$p" ] && p=0
    [ -z "$f" ] && f=0
    if [ "$2" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; echo "FAIL $3 exited with status $2"; fi
    passed=$((passed + p))
    failed=$((failed + f))
    echo "== $3: $p passed, $f failed"
}

if [ "$1" = "--matrix" ]; then
    shift
    CC=${CC:-cc}
    CXX=${CXX:-c++}
    B=${BUILD:-build}/matrix
    mkdir -p "$B"
    W="-Wall -Wextra -Wpedantic -Werror -I. -Itests"
    headers="moe"
    [ -f reward.h ] && headers="moe reward"
    # the SIMD code compiles only for a CPU that has it: C++ for this one, where -march=native works
    native=""
    printf 'int main(void){return 0;}\n' | $CXX -x c++ -march=native - -o "$B/probe" >/dev/null 2>&1 && native=yes
    for h in $headers; do
        # reward.h's macros are RWD_*; its implementation needs moe.h's in the same file
        case $h in
            moe) H=MOE; dep=""; dep_static="" ;;
            reward) H=RWD; dep='#define MOE_IMPLEMENTATION\n'; dep_static='#define MOE_STATIC\n#define MOE_IMPLEMENTATION\n' ;;
        esac
        printf "$dep"'#define %s_IMPLEMENTATION\n#include "%s.h"\nint main(void) { return 0; }\n' "$H" "$h" > "$B/alone_$h.c"
        printf "$dep_static"'#define %s_STATIC\n#define %s_IMPLEMENTATION\n#include "%s.h"\nint main(void) { return 0; }\n' "$H" "$H" "$h" > "$B/static_$h.c"
        printf '#include "%s.h"\nint matrix_other(void) { return 1; }\n' "$h" > "$B/tu_b_$h.c"
        printf "$dep"'#define %s_IMPLEMENTATION\n#include "%s.h"\nint matrix_other(void);\nint main(void) { return matrix_other() - 1; }\n' "$H" "$h" > "$B/tu_a_$h.c"
        set -- "$@" # keep the test list
        for spec in \
            "c99:$CC -std=c99 $W $OMP_FLAG $B/alone_$h.c -o $B/a_$h -lm" \
            "c99-no-openmp:$CC -std=c99 $W $B/alone_$h.c -o $B/b_$h -lm" \
            "c++:$CXX -x c++ -std=c++11 $W $OMP_FLAG $B/alone_$h.c -o $B/c_$h -lm" \
            "static:$CC -std=c99 $W $OMP_FLAG $B/static_$h.c -o $B/d_$h -lm" \
            "two-tu:$CC -std=c99 $W $OMP_FLAG $B/tu_a_$h.c $B/tu_b_$h.c -o $B/e_$h -lm" \
            ${native:+"c++-native:$CXX -x c++ -std=c++11 $W -march=native $OMP_FLAG $B/alone_$h.c -o $B/f_$h -lm"}; do
            name=${spec%%:*}
            cmd=${spec#*:}
            if sh -c "$cmd" > "$log" 2>&1 && [ -x "$B/$(echo "$cmd" | sed 's/.* -o \([^ ]*\).*/\1/' | xargs basename)" ]; then
                passed=$((passed + 1))
                echo "== build $h.h $name: ok"
            else
                failed=$((failed + 1))
                echo "FAIL build $h.h $name: $cmd"
                cat "$log"
            fi
        done
    done
    # model files cross the language boundary: the C test program writes them, the same
    # program built as C++ reads them, and back (tests/test_model_io.c --write/--read)
    io_c=${BUILD:-build}/tests/test_model_io
    io_cxx=$B/test_model_io_cxx
    rm -rf "$B/model_io_c" "$B/model_io_cxx"
    if [ -x "$io_c" ] && mkdir -p "$B/model_io_c" "$B/model_io_cxx" &&
        $CXX -x c++ -std=c++11 $W -O2 -ffp-contract=off $OMP_FLAG tests/test_model_io.c -o "$io_cxx" -lm > "$log" 2>&1 &&
        "$io_c" --write "$B/model_io_c" >> "$log" 2>&1 && "$io_cxx" --read "$B/model_io_c" >> "$log" 2>&1 &&
        "$io_cxx" --write "$B/model_io_cxx" >> "$log" 2>&1 && "$io_c" --read "$B/model_io_cxx" >> "$log" 2>&1; then
        passed=$((passed + 1))
        echo "== model files C -> C++ -> C: ok"
    else
        failed=$((failed + 1))
        echo "FAIL model files C -> C++ -> C (needs $io_c; tests/test_model_io.c --write/--read)"
        cat "$log"
    fi
fi

for t in "$@"; do
    out=$(mktemp)
    "$t" > "$out" 2>&1
    rc=$?
    cat "$out"
    count "$out" "$rc" "$(basename "$t")"
    rm -f "$out"
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
