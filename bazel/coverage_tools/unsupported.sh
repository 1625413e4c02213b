#!/bin/sh
echo "bazel coverage is not supported offline in this workspace" >&2
exit 1
