"""BlockTable: a list of page ids whose int32 array stays equal to it through every kind of change."""
import copy
import pickle
import random

import numpy as np

from pagoda.engine.block_table import BlockTable, page_ids


def _same(t: BlockTable) -> bool:
    ids = t.ids()
    return ids.dtype == np.int32 and ids.tolist() == list(t)


def test_random_changes_keep_the_array_equal_to_the_list():
    rng = random.Random(0)
    t, ref = BlockTable(), []
    for _ in range(3000):
        op = rng.choice(["append", "extend", "iadd", "truncate", "clear", "setitem", "delitem", "insert", "pop"])
        x = rng.randrange(1 << 20)
        if op == "append":
            t.append(x)
            ref.append(x)
        elif op == "extend":
            xs = [rng.randrange(1 << 20) for _ in range(rng.randint(0, 40))]
            t.extend(iter(xs))           # any iterable, consumed once
            ref.extend(xs)
        elif op == "iadd":
            t += [x, x + 1]
            ref += [x, x + 1]
        elif op == "truncate":
            n = rng.randint(0, len(ref))
            t.truncate(n)
            del ref[n:]
        elif op == "clear" and rng.random() < 0.05:
            t.clear()
            ref.clear()
        elif op == "setitem" and ref:
            i = rng.randrange(len(ref))
            t[i] = x
            ref[i] = x
        elif op == "delitem" and ref:
            i = rng.randrange(len(ref))
            del t[i:i + 2]
            del ref[i:i + 2]
        elif op == "insert":
            i = rng.randint(0, len(ref))
            t.insert(i, x)
            ref.insert(i, x)
        elif op == "pop" and ref:
            assert t.pop() == ref.pop()
        assert list(t) == ref and _same(t)
    assert len(ref) > 50   # the table grew past its first array


def test_list_behaviour_slices_copies_and_pickling():
    t = BlockTable(range(5, 40))
    assert t == list(range(5, 40)) and type(t[:3]) is list and t[:3] == [5, 6, 7]
    for c in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t), copy.copy(t)):
        assert isinstance(c, BlockTable) and c == t and _same(c)
        c.append(99)
        assert t[-1] == 39 and _same(c)    # a copy owns its array
    assert page_ids(t, 4).tolist() == [5, 6, 7, 8] and page_ids([1, 2, 3], 2).tolist() == [1, 2]
    assert page_ids(t, 0).shape == (0,)
