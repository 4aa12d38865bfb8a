"""The newc cpio model: paths, the tree the kernel leaves, and what to append or write.

Pure functions on Entry values; the expected results are worked out by hand from the
kernel's rules (init/initramfs.c). Reading and writing real archives is test_initramfs.
"""

from __future__ import annotations

import pytest

from archkernel.errors import UserError
from archkernel.formats import cpio
from archkernel.formats.cpio import Entry
from tests.support.safety_net import safety_net

OLD_INIT = b"#!/bin/sh\nmount -t proc proc /proc\nexec switch_root /newroot /sbin/init\n"
NEW_INIT = b"#!/bin/sh\n/bin/busybox --install -s\ninsmod /lib/modules/nbd.ko\n. /init.scw\n"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("./init", "init"), ("init", "init"), (".", "."), ("./", "."), ("a//b/./c/", "a/b/c")],
)
def test_normalise_path(name: str, expected: str) -> None:
    assert cpio.normalise_path(name, source="t") == expected


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty name"),
        ("/etc/passwd", "absolute path"),
        ("../../etc/passwd", "'..' component"),
        ("a/../../x", "'..' component"),
        ("a/..", "'..' component"),
        ("bad\nname", "NUL or newline"),
        ("bad\0name", "NUL or newline"),
    ],
)
def test_normalise_path_refuses(name: str, problem: str) -> None:
    with pytest.raises(UserError) as caught:
        cpio.normalise_path(name, source="initrd X")
    assert problem in caught.value.message
    assert "initrd X" in caught.value.message


def test_merged_view_later_entries_replace_earlier() -> None:
    first = Entry.file("init", b"old")
    second = Entry.symlink("init", "bin/busybox")
    tree = cpio.merged_view([Entry.directory("."), first, Entry.directory("bin"), second])
    assert tree["init"] is second
    assert sorted(tree) == [".", "bin", "init"]


def test_original_init_is_the_last_init() -> None:
    last = Entry.file("init", b"second")
    assert cpio.original_init([Entry.file("init", b"first"), last]) is last


def test_original_init_missing() -> None:
    with pytest.raises(UserError) as caught:
        cpio.original_init([Entry.directory("."), Entry.file("linuxrc", b"x")])
    assert caught.value.message == "the initrd has no /init"


def test_padding_for_reaches_a_multiple_of_four() -> None:
    assert [len(cpio.padding_for(n)) for n in (0, 1, 2, 3, 4, 5)] == [0, 3, 2, 1, 0, 3]
    assert cpio.padding_for(7) == b"\0"


@pytest.mark.parametrize(
    ("data", "pos", "expected"),
    [(b"", 0, 0), (b"\0\0\0", 0, 3), (b"\x00\x00070701", 0, 2), (b"ab\0\0c", 2, 4), (b"ab", 1, 1)],
)
def test_skip_padding_finds_the_next_non_zero_byte(data: bytes, pos: int, expected: int) -> None:
    assert cpio.skip_padding(data, pos) == expected


ORIGINAL = [
    Entry.directory("."),
    Entry.directory("usr"),
    Entry.directory("usr/lib", mode=0o700),
    Entry.symlink("lib", "usr/lib"),
    Entry.file("init", OLD_INIT, mode=0o755),
    Entry.file("etc", b"not a directory"),
]


def test_plan_additions_keeps_original_directories_and_adds_the_rest() -> None:
    module = Entry.file("usr/lib/modules/nbd.ko", b"\x7fELF")
    plan = cpio.plan_additions(
        ORIGINAL,
        [
            Entry.directory("usr"),
            Entry.directory("usr/lib"),
            Entry.directory("usr/lib/modules"),
            module,
            Entry.file("init", NEW_INIT, mode=0o755),
        ],
        source="the initrd",
    )
    assert [(e.path, e.type) for e in plan] == [
        ("usr/lib/modules", "dir"),
        ("usr/lib/modules/nbd.ko", "file"),
        ("init", "file"),
    ]


def test_plan_additions_over_a_plain_init_writes_the_file_only() -> None:
    plan = cpio.plan_additions(ORIGINAL, [Entry.file("init", NEW_INIT)], source="s")
    assert [(e.path, e.type) for e in plan] == [("init", "file")]


def test_plan_additions_over_a_hard_linked_init_unlinks_it_first() -> None:
    original = [
        Entry.directory("."),
        Entry("init", "file", 0o755, nlink=2),
        Entry(
            "linuxrc", "file", 0o755, size=len(OLD_INIT), linkpath="init", hardlink=True, nlink=2
        ),
    ]
    plan = cpio.plan_additions(original, [Entry.file("init", NEW_INIT)], source="s")
    assert [(e.path, e.type) for e in plan] == [("init", "symlink"), ("init", "file")]
    assert plan[1].data == NEW_INIT


@pytest.mark.parametrize(
    ("addition", "problem"),
    [
        (Entry.file("lib/modules/nbd.ko", b"x"), "a symlink in s -> 'usr/lib'"),
        (Entry.file("etc/hosts", b"x"), "is below 'etc', a file in s"),
        (Entry.directory("etc"), "is a dir but s has a file there"),
        (Entry.file("usr", b"x"), "is a file but s has a dir there"),
        (Entry.file("opt/thing", b"x"), "has no parent directory 'opt'"),
    ],
)
def test_plan_additions_refuses(addition: Entry, problem: str) -> None:
    with pytest.raises(UserError) as caught:
        cpio.plan_additions(ORIGINAL, [addition], source="s")
    assert problem in caught.value.message
    assert addition.path in caught.value.message


def test_plan_additions_refuses_a_path_given_twice() -> None:
    with pytest.raises(UserError, match="twice"):
        cpio.plan_additions(ORIGINAL, [Entry.file("a", b"1"), Entry.file("./a", b"2")], source="s")


def test_plan_additions_refuses_a_path_below_an_added_file() -> None:
    with pytest.raises(UserError, match="below 'new', which is a file"):
        cpio.plan_additions(
            ORIGINAL, [Entry.file("new", b"1"), Entry.file("new/x", b"2")], source="s"
        )


def test_plan_archive_orders_parents_first_and_numbers_inodes() -> None:
    plan = cpio.plan_archive(
        [
            Entry.file("b/x", b"1"),
            Entry.directory("b"),
            Entry.file("a-b", b"2"),
            Entry.directory("a"),
            Entry.file("a/z", b"3"),
        ]
    )
    assert [m.entry.path for m in plan] == ["a", "a/z", "a-b", "b", "b/x"]
    assert [m.ino for m in plan] == [1, 2, 3, 4, 5]


def test_plan_archive_puts_hard_link_contents_on_the_last_member() -> None:
    plan = cpio.plan_archive(
        [
            Entry.file("z", b"shared"),
            Entry("a", "file", linkpath="z", hardlink=True),
            Entry("m", "file", linkpath="z", hardlink=True),
        ]
    )
    assert [(m.entry.path, m.ino, m.nlink, m.data) for m in plan] == [
        ("a", 1, 3, b""),
        ("m", 1, 3, b""),
        ("z", 1, 3, b"shared"),
    ]


def test_plan_archive_refuses_a_hard_link_to_nothing() -> None:
    with pytest.raises(UserError, match="which is not a regular file of the archive"):
        cpio.plan_archive([Entry("a", "file", linkpath="missing", hardlink=True)])


def test_plan_archive_refuses_missing_contents() -> None:
    with pytest.raises(UserError, match="contents were not given"):
        cpio.plan_archive([Entry("a", "file", size=10)])


# --- TreeRules: what the kernel would apply wrongly ---------------------------------------------


def rules_refuse(entries: list[Entry]) -> str:
    """The message of the UserError TreeRules raises for the last of `entries`."""
    rules = cpio.TreeRules("t")
    for entry in entries[:-1]:
        rules.add(entry)
    with pytest.raises(UserError) as caught:
        rules.add(entries[-1])
    return caught.value.message


def test_tree_rules_refuse_a_path_through_a_symlink_however_deep() -> None:
    deep = "/".join(["d"] * 50)
    assert rules_refuse([Entry.symlink("a", "/etc"), Entry.file(f"a/{deep}/x", b"")]) == (
        f"entry 'a/{deep}/x' in t passes through the symlink 'a' -> '/etc'"
    )


def test_tree_rules_see_a_symlink_made_after_an_entry_below_it() -> None:
    # `a/b` first (the kernel cannot create it without `a`), then `a` a symlink, then `a/b/c`.
    entries = [Entry.directory("a/b"), Entry.symlink("a", "/tmp"), Entry.file("a/b/c", b"")]
    assert rules_refuse(entries) == "entry 'a/b/c' in t passes through the symlink 'a' -> '/tmp'"


def test_tree_rules_refuse_below_a_file_and_over_a_populated_directory() -> None:
    assert rules_refuse([Entry.file("f", b""), Entry.file("f/g/h", b"")]) == (
        "entry 'f/g/h' in t is below 'f', which is a file"
    )
    entries = [Entry.directory("d"), Entry.file("d/x", b""), Entry.file("d", b"")]
    assert rules_refuse(entries) == "entry 'd' in t replaces a directory that is not empty"


def test_tree_rules_accept_replacing_an_empty_directory_and_a_symlink_made_a_directory() -> None:
    rules = cpio.TreeRules("t")
    for entry in [
        Entry.directory("e"),
        Entry.file("e", b""),
        Entry.symlink("l", "/etc"),
        Entry.directory("l"),
        Entry.file("l/x", b""),
    ]:
        rules.add(entry)


def test_tree_rules_cost_the_length_of_a_name_not_its_square() -> None:
    # A table of whole ancestor paths made each 4 KB name cost 2,000 paths of ~2 KB: for
    # 1,000 such names, 45 s. By component it is about a millisecond a name.
    deep = "/".join(["a"] * 2000)
    rules = cpio.TreeRules("t")
    with safety_net(30):
        for i in range(1000):
            rules.add(Entry.file(f"{deep}{i}", b""))
        rules.add(Entry.symlink("a/a", "/etc"))
        with pytest.raises(UserError, match="passes through the symlink 'a/a' -> '/etc'"):
            rules.add(Entry.file(f"{deep}x", b""))


@pytest.mark.parametrize("entry", [Entry.file(".", b""), Entry.symlink(".", "/etc")])
def test_tree_rules_refuse_a_root_that_is_not_a_directory(entry: Entry) -> None:
    assert rules_refuse([entry]) == f"entry '.' in t is the root but a {entry.type}"
