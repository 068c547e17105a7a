"""`python -m mstl.models prefetch NAME --base-url URL`: put a backbone's ImageNet file in the Keras
cache."""

import argparse

from mstl.models.backbones import prefetch_imagenet_weights

parser = argparse.ArgumentParser(description=__doc__)
sub = parser.add_subparsers(dest="command", required=True)
prefetch = sub.add_parser(
    "prefetch", help="download (and SHA-256 check) ImageNet weights through keras.utils.get_file"
)
prefetch.add_argument("name")
prefetch.add_argument(
    "--base-url",
    default=None,
    help="mirror folder URL (https:// or file://) holding the Keras file",
)
args = parser.parse_args()
print(prefetch_imagenet_weights(args.name, args.base_url))
