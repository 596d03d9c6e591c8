# Shared build steps of every Hearth runtime image (sourced by each image's helpers/build.sh).
#
# Contract (runtime-protocol.md §1): the source is in /mnt/code; it is copied to /usr/local/build,
# the image's `prepare_build` hook runs there, then the install command, then the output directory
# is packed with a `.open-runtimes` file into /mnt/code/code.tar.gz. Any failing step exits non-zero.
# The caller defines `prepare_build` (may be a no-op) before sourcing this file.
set -eo pipefail

install_command="${1:-}"
build_dir=/usr/local/build

if [ ! -d /mnt/code ] || [ -z "$(ls -A /mnt/code 2>/dev/null)" ]; then
  echo "Error: No source code found. Ensure your source isn't empty."
  exit 1
fi

echo "Environment preparation started."
mkdir -p "$build_dir"
# The source may arrive as an archive (from storage) or as plain files.
if [ -f /mnt/code/code.tar.gz ] || [ -f /mnt/code/code.tar ]; then
  archive=/mnt/code/code.tar.gz
  [ -f "$archive" ] || archive=/mnt/code/code.tar
  tar -xf "$archive" -C "$build_dir"
  rm -f "$archive"
else
  cp -a /mnt/code/. "$build_dir"/
fi
cd "$build_dir"
prepare_build

echo "Build command execution started."
if [ -n "$install_command" ]; then
  bash -c "$install_command"
fi
echo "Build command execution finished."

echo "Build packaging started."
output_dir="$build_dir"
if [ -n "${OPEN_RUNTIMES_OUTPUT_DIRECTORY:-}" ]; then
  output_dir="$build_dir/$OPEN_RUNTIMES_OUTPUT_DIRECTORY"
fi
if [ ! -d "$output_dir" ] || [ -z "$(ls -A "$output_dir" 2>/dev/null)" ]; then
  echo "Error: Build output directory '${OPEN_RUNTIMES_OUTPUT_DIRECTORY:-.}' is empty or missing."
  exit 1
fi

# What the build knew wins at start: record it next to the code.
{
  if [ -n "${OPEN_RUNTIMES_ENTRYPOINT:-}" ]; then
    printf 'OPEN_RUNTIMES_ENTRYPOINT=%q\n' "$OPEN_RUNTIMES_ENTRYPOINT"
  fi
  if [ -n "${OPEN_RUNTIMES_START_COMMAND:-}" ]; then
    printf 'OPEN_RUNTIMES_START_COMMAND=%q\n' "$OPEN_RUNTIMES_START_COMMAND"
  fi
} > "$output_dir/.open-runtimes"

if [ "${OPEN_RUNTIMES_BUILD_COMPRESSION:-gzip}" = "none" ]; then
  tar -C "$output_dir" -cf /mnt/code/code.tar.gz .
else
  tar -C "$output_dir" -czf /mnt/code/code.tar.gz .
fi
echo "Build finished."
