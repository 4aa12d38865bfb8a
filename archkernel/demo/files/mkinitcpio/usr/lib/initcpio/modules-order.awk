# Load order of kernel modules, computed the way kmod's modprobe does it.
#
# Part of the archkernel test stand-in for mkinitcpio; runs under busybox awk.
#   awk -v moddir=/usr/lib/modules/VERSION -v names="hv_vmbus ext4" -f modules-order.awk
# prints, in load order, one line per module to load:  MOD <name> <path relative to moddir>
# and for requested names that need no loading:        BUILTIN <name>
# or that cannot be found:                             MISSING <name>
#
# Why kmod's order and not a plain topological sort: the test suite compares the list
# with `modprobe --show-depends` (first occurrences), so the emulation follows libkmod's
# probe list: a module's dependencies in the reverse of their modules.dep order, each
# preceded by its soft "pre:" dependencies and followed by its "post:" ones. Names are
# looked up like kmod_module_new_from_lookup: modules.dep first, then modules.alias
# (exact aliases only), then modules.builtin.

function norm(s) {
    gsub(/-/, "_", s)
    return s
}

function modname(p,   n) {
    n = p
    sub(/.*\//, "", n)
    sub(/\.ko(\.[a-z]+)?$/, "", n)
    return norm(n)
}

# Resolve `name` once into lk[name, 1..nlk[name]] (loadable modules only).
function lookup(name,   k, m) {
    if (name in looked)
        return
    looked[name] = 1
    nlk[name] = 0
    if (name in path) {
        lk[name, ++nlk[name]] = name
        return
    }
    for (k = 1; k <= nal[name]; k++) {
        m = al[name, k]
        if (m in path)
            lk[name, ++nlk[name]] = m
    }
}

function emit(m) {
    if (m in emitted)
        return
    emitted[m] = 1
    print "MOD " m " " path[m]
}

function probe(m,   k) {
    if (m in visited)
        return
    visited[m] = 1
    for (k = ndep[m]; k >= 1; k--)
        fill(dep[m, k])
    fill(m)
}

function fill(m,   k, j, s) {
    for (k = 1; k <= npre[m]; k++) {
        s = pre[m, k]
        lookup(s)
        for (j = 1; j <= nlk[s]; j++)
            probe(lk[s, j])
    }
    emit(m)
    for (k = 1; k <= npost[m]; k++) {
        s = post[m, k]
        lookup(s)
        for (j = 1; j <= nlk[s]; j++)
            probe(lk[s, j])
    }
}

BEGIN {
    if (moddir == "") {
        print "modules-order.awk: moddir is not set" > "/dev/stderr"
        exit 2
    }
    f = moddir "/modules.dep"
    found = 0
    while ((getline line < f) > 0) {
        found = 1
        i = index(line, ":")
        if (i == 0)
            continue
        p = substr(line, 1, i - 1)
        m = modname(p)
        path[m] = p
        n = split(substr(line, i + 1), d, " ")
        ndep[m] = n
        for (k = 1; k <= n; k++)
            dep[m, k] = modname(d[k])
    }
    close(f)
    if (!found) {
        print "modules-order.awk: cannot read " f > "/dev/stderr"
        exit 2
    }

    # Only the first softdep line of a module counts, as in kmod.
    f = moddir "/modules.softdep"
    while ((getline line < f) > 0) {
        n = split(line, w, " ")
        if (n < 2 || w[1] != "softdep")
            continue
        m = norm(w[2])
        if (m in hassoft)
            continue
        hassoft[m] = 1
        mode = ""
        for (k = 3; k <= n; k++) {
            if (w[k] == "pre:")
                mode = "pre"
            else if (w[k] == "post:")
                mode = "post"
            else if (mode == "pre")
                pre[m, ++npre[m]] = norm(w[k])
            else if (mode == "post")
                post[m, ++npost[m]] = norm(w[k])
        }
    }
    close(f)

    f = moddir "/modules.alias"
    while ((getline line < f) > 0) {
        n = split(line, w, " ")
        if (n != 3 || w[1] != "alias" || w[2] ~ /[*?[]/)
            continue
        a = norm(w[2])
        al[a, ++nal[a]] = norm(w[3])
    }
    close(f)

    f = moddir "/modules.builtin"
    while ((getline line < f) > 0)
        builtin[modname(line)] = 1
    close(f)

    n = split(names, want, " ")
    for (i = 1; i <= n; i++) {
        r = norm(want[i])
        lookup(r)
        if (nlk[r] == 0) {
            if (r in builtin)
                print "BUILTIN " r
            else
                print "MISSING " r
            continue
        }
        for (j = 1; j <= nlk[r]; j++)
            probe(lk[r, j])
    }
    exit 0
}
