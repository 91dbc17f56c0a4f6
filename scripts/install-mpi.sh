#!/usr/bin/env bash
# What the optional `mpi` feature needs (README, "Data parallel"), from Debian's packages:
# Open MPI (library, headers, mpirun) and libclang (rsmpi's bindings are generated at build time).
# Does nothing when they are already there. Needs root (or sudo) and apt-get.
set -euo pipefail
have() { command -v mpirun >/dev/null && command -v mpicc >/dev/null && ldconfig -p | grep -q 'libclang'; }
if have; then
    echo "install-mpi: Open MPI and libclang already installed" >&2
    exit 0
fi
command -v apt-get >/dev/null || { echo "install-mpi: apt-get not found; install Open MPI (or MPICH) and libclang with your package manager" >&2; exit 1; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends libopenmpi-dev openmpi-bin libclang-dev >/dev/null
have || { echo "install-mpi: installed, but mpirun, mpicc or libclang is still missing" >&2; exit 1; }
echo "install-mpi: installed $(mpirun --version | head -1)" >&2
