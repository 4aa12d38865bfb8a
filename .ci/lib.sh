# Shell functions of .ci/setup, sourced (and tested by tests/test_ci.py).

# have_package_lists DIR: true when DIR holds apt package lists, compressed or not.
have_package_lists() {
    local f
    for f in "$1"/*_Packages "$1"/*_Packages.*; do
        [ -s "$f" ] && return 0
    done
    return 1
}

# srcinfo_field FIELD FILE: the values of FIELD in an AUR .SRCINFO, one a line (also its
# per-architecture form FIELD_x86_64).
srcinfo_field() {
    sed -n -E "s/^[[:space:]]*$1(_x86_64)? = (.*)$/\\2/p" "$2"
}

# srcinfo_needs FILE: the packages an AUR package needs to build, check and run, by name
# (version constraints dropped), once each.
srcinfo_needs() {
    local field
    for field in depends makedepends checkdepends; do
        srcinfo_field "$field" "$1"
    done | sed -E 's/[<>=].*$//' | sort -u
}

# prune_package_cache DIR MANIFEST...: keep in the pacman cache DIR only the packages (and
# their signatures) that the manifests name as `name version` lines (pacman -Q, a build's
# packages.txt); remove pacman's unfinished downloads. Keeps a CI cache from growing with
# every upgrade.
prune_package_cache() {
    local dir=$1 manifest name version rest file stem
    shift
    declare -A wanted=()
    for manifest in "$@"; do
        while read -r name version rest; do
            [ -n "$name" ] && [ -n "$version" ] && wanted["$name-$version"]=1
        done <"$manifest"
    done
    for file in "$dir"/*.pkg.tar.*; do
        [ -f "$file" ] || continue
        stem=${file##*/}
        stem=${stem%%.pkg.tar.*} # name-pkgver-pkgrel-arch
        stem=${stem%-*}          # name-pkgver-pkgrel: pacman -Q's `name version`
        [ -n "${wanted[$stem]:-}" ] || rm -f -- "$file"
    done
    rm -rf -- "$dir"/download-*
}
