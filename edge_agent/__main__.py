"""`python -m edge_agent encode --image IMG --k K --out FILE`: the device's half, to a file."""
import argparse
import json
import sys
from pathlib import Path

from progvlm.images import ImageInputError

from .device import EdgeDevice


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent",
                                     description="The edge (camera device) side of progvlm.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    enc = sub.add_parser("encode", help="image → progressive bitstream of k layers",
                         description="Run the VLM's edge half and the MAE encoder on one image "
                         "and write the first k layers as a bitstream; prints sizes and stage "
                         "times (host CPU, measured) as JSON.")
    enc.add_argument("--image", required=True, type=Path)
    enc.add_argument("--k", type=int, default=None, help="layers to send (default: all)")
    enc.add_argument("--out", type=Path, required=True, help="where to write the bitstream")
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    device = EdgeDevice.bundled()
    try:
        result = device.encode(a.image, a.k or device.mae.cfg.num_layers)
    except (ImageInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.out.write_bytes(result.bitstream)
    print(json.dumps({"out": str(a.out), "bytes": len(result.bitstream), "k": result.k,
                      "layer_payload_bytes": result.layer_bytes, "stage_ms": result.stage_ms,
                      "timing": "host CPU, measured"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
