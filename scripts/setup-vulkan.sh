#!/usr/bin/env bash
# Makes a Vulkan driver available to wgpu: on a machine without a GPU driver, Mesa's lavapipe
# (a Vulkan implementation on the CPU) from Debian's `mesa-vulkan-drivers` + `libvulkan1`,
# installed with apt when missing (needs root, or passwordless sudo). Idempotent and quick when
# everything is present. Exit 0 when a Vulkan loader and at least one ICD are present afterwards,
# 1 otherwise (with a message); the caller decides whether that is fatal.
#
# wgpu must then be told to use Vulkan (`WGPU_BACKEND=vulkan`, exported by scripts/test.sh and
# scripts/demo.sh); without it wgpu may pick a slower GL path where one exists.
set -uo pipefail

have_vulkan() {
    ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' &&
        compgen -G "/usr/share/vulkan/icd.d/*.json" >/dev/null
}

have_vulkan && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-vulkan: no Vulkan driver and no apt-get; install your GPU's Vulkan driver (or Mesa's lavapipe)" >&2
    exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "setup-vulkan: not root and no passwordless sudo; run: apt-get install mesa-vulkan-drivers libvulkan1" >&2
        exit 1
    fi
fi
pkgs=(mesa-vulkan-drivers libvulkan1)
echo "setup-vulkan: installing ${pkgs[*]} (lavapipe: Vulkan on the CPU)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2; then
    "${sudo[@]}" apt-get update -q >&2 &&
        "${sudo[@]}" apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2
fi
if have_vulkan; then
    exit 0
fi
echo "setup-vulkan: Vulkan still unavailable after installing ${pkgs[*]}" >&2
exit 1
