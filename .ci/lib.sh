# Shell functions of .ci/setup, sourced (and tested by tests/test_ci.py).

# have_package_lists DIR: true when DIR holds apt package lists, compressed or not.
have_package_lists() {
    local f
    for f in "$1"/*_Packages "$1"/*_Packages.*; do
        [ -s "$f" ] && return 0
    done
    return 1
}
