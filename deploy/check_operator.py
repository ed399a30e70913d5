"""Check that the cluster's KubeRay operator is new enough for these manifests.

The manifests need KubeRay 1.6.0 or newer: it keeps every port of a custom serve Service
(the gRPC port with appProtocol kubernetes.io/h2c), and it implements authOptions and
excludeHeadPodFromServeSvc. An older operator accepts the RayService and silently serves
no gRPC on the serve Service. Run this before `kubectl apply -k`:

    python deploy/check_operator.py [--namespace kuberay-system] [--deployment kuberay-operator]

It reads the operator Deployment's image tag with kubectl and exits 1 with the reason if
the version is older (or cannot be read).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

MIN_KUBERAY_VERSION = (1, 6, 0)


def version_from_image(image: str) -> tuple[int, int, int] | None:
    """(1, 6, 0) from 'quay.io/kuberay/operator:v1.6.0'; None for a digest or untagged image."""
    match = re.search(r":v?(\d+)\.(\d+)\.(\d+)(?:[-+][\w.]+)?$", image.split("@")[0])
    return tuple(int(part) for part in match.groups()) if match else None


def check_image(image: str) -> str | None:
    """None if `image` is a new enough operator, else what is wrong and how to fix it."""
    wanted = ".".join(map(str, MIN_KUBERAY_VERSION))
    version = version_from_image(image)
    if version is None:
        return (f"cannot tell the KubeRay version of operator image {image!r} (no vX.Y.Z tag); promptmux needs "
                f"KubeRay >= {wanted}: install it with helm (--version {wanted}) or check the image by hand")
    if version < MIN_KUBERAY_VERSION:
        return (f"the KubeRay operator is {'.'.join(map(str, version))}, promptmux needs >= {wanted} (gRPC on the "
                f"serve Service, authOptions, excludeHeadPodFromServeSvc): helm upgrade kuberay-operator "
                f"kuberay/kuberay-operator --version {wanted}")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default="kuberay-system")
    parser.add_argument("--deployment", default="kuberay-operator")
    args = parser.parse_args(argv)
    command = ["kubectl", "get", "deployment", args.deployment, "-n", args.namespace,
               "-o", "jsonpath={.spec.template.spec.containers[0].image}"]
    try:
        image = subprocess.run(command, check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        print(f"check_operator: could not read the operator deployment ({' '.join(command)}): {error}", file=sys.stderr)
        return 1
    problem = check_image(image)
    if problem:
        print(f"check_operator: {problem}", file=sys.stderr)
        return 1
    print(f"KubeRay operator {image}: OK (>= {'.'.join(map(str, MIN_KUBERAY_VERSION))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
