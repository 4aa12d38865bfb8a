# Read one variable from bash-style configuration files without bash.
#
# Part of the archkernel test stand-in for mkinitcpio; runs under busybox awk, whose sh
# has no arrays, so `MODULES=(a b)` cannot simply be sourced.
#   awk -v var=MODULES -f parse-conf.awk FILE...
# prints the variable's final value, one word per line (nothing when it is unset or empty).
# Files are read in order, as `source` would: `VAR=...` replaces, `VAR+=...` appends.
# Understood: scalars and (possibly multi-line) arrays, single and double quotes, comments.
# Not understood (and not used by mkinitcpio.conf or presets): expansions and commands.

# Split `s` into words in tok[1..ntok]; "(" and ")" outside quotes are words of their own.
# A word that was quoted is kept even when empty.
function tokenize(s,   i, c, q, w, have) {
    ntok = 0
    q = ""
    w = ""
    have = 0
    for (i = 1; i <= length(s); i++) {
        c = substr(s, i, 1)
        if (q != "") {
            if (c == q)
                q = ""
            else
                w = w c
            continue
        }
        if (c == "'" || c == "\"") {
            q = c
            have = 1
        } else if (c == " " || c == "\t") {
            if (have)
                tok[++ntok] = w
            w = ""
            have = 0
        } else if (c == "#" && !have) {
            break
        } else if (c == "(" || c == ")") {
            if (have)
                tok[++ntok] = w
            tok[++ntok] = c
            w = ""
            have = 0
        } else {
            w = w c
            have = 1
        }
    }
    if (have)
        tok[++ntok] = w
}

BEGIN {
    nval = 0
    inarray = 0
}

# An array left open at the end of a file does not swallow the next file.
FNR == 1 {
    inarray = 0
}

{
    line = $0
    if (!inarray) {
        if (!match(line, /^[ \t]*[A-Za-z_][A-Za-z0-9_]*\+?=/))
            next
        head = substr(line, RSTART, RLENGTH)
        rest = substr(line, RSTART + RLENGTH)
        sub(/^[ \t]*/, "", head)
        append = (head ~ /\+=$/)
        name = head
        sub(/\+?=$/, "", name)
        if (name != var)
            next
        # `VAR= value` would run a command in bash: treat it as an empty assignment.
        if (rest ~ /^[ \t]/)
            rest = ""
        if (!append)
            nval = 0
        tokenize(rest)
        if (ntok >= 1 && tok[1] == "(") {
            inarray = 1
            start = 2
        } else {
            if (ntok >= 1)
                val[++nval] = tok[1]
            next
        }
    } else {
        tokenize(line)
        start = 1
    }
    for (k = start; k <= ntok; k++) {
        if (tok[k] == ")") {
            inarray = 0
            break
        }
        val[++nval] = tok[k]
    }
}

END {
    for (k = 1; k <= nval; k++)
        if (val[k] != "")
            print val[k]
}
