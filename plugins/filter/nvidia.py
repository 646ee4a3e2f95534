# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Decisions of the nvidia_driver role, as filters (documented in nvidia_driver_state.yml,
nvidia_driver_packages.yml and secure_boot_state.yml).

The logic lives in plain functions that raise ValueError, so the unit tests call them
directly; the filter wrappers turn ValueError into AnsibleFilterError.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any, Optional

from ansible.errors import AnsibleFilterError

# 550.90.07, 550.54.15, 535.216.01; packaging adds an epoch ("3:") and a revision ("-1",
# "-0ubuntu0.24.04.1", "-1.el9").
_VERSION = re.compile(r"^(?:\d+:)?(?P<upstream>(?P<branch>\d{3,4})\.\d+(?:\.\d+)?)(?:[-~+].*)?$")
_BRANCH = re.compile(r"^\d{3,4}$")
_PLACEHOLDERS = ("branch", "version")


def upstream_version(version: Any) -> Optional[str]:
    """``3:550.90.07-1.el9`` -> ``550.90.07``; None for None or an empty string."""
    if version is None or version == "":
        return None
    match = _VERSION.match(str(version).strip())
    if match is None:
        raise ValueError(
            "{0!r} is not an NVIDIA driver version; expected <branch>.<minor>[.<patch>] such as "
            "550.90.07, optionally with an epoch and a package revision".format(version)
        )
    return match.group("upstream")


def branch_of(version: Any) -> Optional[str]:
    """``550.90.07`` -> ``550``; None for None."""
    upstream = upstream_version(version)
    return upstream.split(".", 1)[0] if upstream else None


def _check_branch(branch: Any) -> str:
    text = str(branch).strip()
    if not _BRANCH.match(text):
        raise ValueError(
            "nvidia_driver_branch is {0!r}; set it to a driver branch such as \"550\" or \"570\" "
            "(the first number of the driver version)".format(branch)
        )
    return text


def _newer(branch: str, than: str) -> bool:
    try:
        return int(branch) > int(than)
    except ValueError:
        return False


def driver_state(gpus: Any, branch: Any, module_version: Any = None, installed_version: Any = None) -> dict:
    """What the driver role has to do on one host.

    ``gpus`` is the ``aphrodite_gpus`` fact of ``aphrodite.baremetal.gpu_facts``;
    ``branch`` the wanted branch; ``module_version`` the content of
    ``/sys/module/nvidia/version`` (the kernel module really loaded) when readable;
    ``installed_version`` the version of the driver package installed, if any.

    The loaded version is the kernel module's when known, else the one nvidia-smi
    reports.  ``action`` is ``none`` when the wanted branch is loaded and no other
    branch is installed (or the wanted branch is installed and only waits for a
    reboot), ``install`` when no driver is loaded, ``change`` when another branch is,
    ``downgrade`` when a newer branch's packages are installed (the role refuses it).
    """
    wanted = _check_branch(branch)
    if not isinstance(gpus, Mapping):
        raise ValueError("nvidia_driver_state expects the aphrodite_gpus fact of aphrodite.baremetal.gpu_facts")
    if gpus.get("source") == "none" or not gpus.get("count"):
        raise ValueError(
            "no NVIDIA GPU was found (nvidia-smi and lspci list none); take the host out of the "
            "gpu_nodes group, or check that the GPUs are seated and visible in `lspci -d 10de:`"
        )
    loaded = upstream_version(str(module_version).strip()) if module_version else None
    if loaded is None:
        loaded = upstream_version(gpus.get("driver_version"))
    installed = upstream_version(installed_version)
    loaded_branch = branch_of(loaded)
    installed_branch = branch_of(installed)

    if installed_branch not in (None, wanted) and _newer(installed_branch, wanted):
        # apt keeps installed packages that satisfy the branch's meta package, so installing
        # an older branch over them would change nothing (and a reboot would load the newer).
        action = "downgrade"
        reason = "branch {0} is installed ({1}), the older {2} is wanted".format(installed_branch, installed, wanted)
    elif installed_branch not in (None, wanted):
        action = "change"
        if loaded_branch == installed_branch:
            reason = "branch {0} is loaded ({1}), {2} is wanted".format(loaded_branch, loaded, wanted)
        else:
            reason = "branch {0} is installed, {1} is wanted".format(installed_branch, wanted)
    elif loaded_branch == wanted:
        action = "none"
        reason = "branch {0} is loaded ({1})".format(wanted, loaded)
    elif installed_branch == wanted:
        action = "none"
        reason = "branch {0} is installed ({1}) and waits for a reboot to be loaded".format(wanted, installed)
    elif loaded_branch is None:
        action = "install"
        reason = "no NVIDIA driver is loaded; branch {0} is wanted".format(wanted)
    else:
        action = "change"
        reason = "branch {0} is loaded ({1}), {2} is wanted".format(loaded_branch, loaded, wanted)

    return {
        "wanted_branch": wanted,
        "loaded_version": loaded,
        "loaded_branch": loaded_branch,
        "installed_version": installed,
        "installed_branch": installed_branch,
        "action": action,
        "reason": reason,
        # Packages newer than the module in the kernel: user space and kernel disagree
        # until the next boot (nvidia-smi then fails with a version mismatch).
        "reboot_pending": installed is not None and installed != loaded,
        "gpu_count": gpus.get("count"),
        "nvswitch": bool(gpus.get("nvswitch")),
    }


def driver_packages(sources: Any, source: Any, branch: Any, open_modules: bool = True,
                    part: str = "driver", version: Any = None) -> list:
    """The package specifications of one part of the driver, from a platform's data.

    ``sources`` is the platform's ``__nvidia_driver_sources`` (vars/<platform>.yml):
    for each source, ``packages.open`` / ``packages.proprietary`` (the driver),
    ``version_package`` (the package whose version is the driver's) and
    ``fabric_manager`` (Fabric Manager, pinned to the driver version), with
    ``{branch}`` and ``{version}`` placeholders.
    """
    wanted = _check_branch(branch)
    if not isinstance(sources, Mapping) or not sources:
        raise ValueError("nvidia_driver_packages expects the platform's __nvidia_driver_sources mapping")
    if source not in sources:
        raise ValueError(
            "nvidia_driver_source is {0!r}, which this platform does not offer; use one of {1}".format(
                source, ", ".join(sorted(sources)))
        )
    data = sources[source] or {}
    if part == "driver":
        flavour = "open" if open_modules else "proprietary"
        templates = (data.get("packages") or {}).get(flavour)
        if not templates:
            raise ValueError(
                "the {0} source of this platform has no {1} kernel modules; set "
                "nvidia_driver_open_kernel_modules to {2} or choose another nvidia_driver_source".format(
                    source, flavour, "false" if open_modules else "true")
            )
    elif part == "version_package":
        templates = [data["version_package"]] if data.get("version_package") else []
        if not templates:
            raise ValueError("the {0} source of this platform names no version_package".format(source))
    elif part == "fabric_manager":
        templates = data.get("fabric_manager")
        if not templates:
            raise ValueError(
                "the {0} source of this platform has no Fabric Manager, which NVSwitch systems need; "
                "set nvidia_driver_source to one that has (the CUDA repository does)".format(source)
            )
        if version is None or upstream_version(version) is None:
            raise ValueError("Fabric Manager must match the driver version exactly; no driver version is known yet")
    else:
        raise ValueError("part must be 'driver', 'version_package' or 'fabric_manager', not {0!r}".format(part))

    values = {"branch": wanted, "version": upstream_version(version) if version else ""}
    result = []
    for template in templates:
        try:
            result.append(str(template).format(**values))
        except (KeyError, IndexError) as exc:
            raise ValueError(
                "package template {0!r} uses an unknown placeholder {1}; only {2} exist".format(
                    template, exc, ", ".join("{" + p + "}" for p in _PLACEHOLDERS))
            ) from None
    return result


# The SecureBoot EFI variable: 4 bytes of attributes, then 1 byte of value.
_SB_ENABLED = re.compile(r"^SecureBoot enabled", re.M)
_SB_DISABLED = re.compile(r"^SecureBoot disabled", re.M)
_NO_EFI = re.compile(r"EFI variables are not supported", re.I)


def secure_boot_state(mokutil: Any, efi_present: bool = True, efivar: Any = None) -> str:
    """``enabled``, ``disabled``, ``not-uefi`` or ``unknown``.

    ``mokutil`` is the registered result of ``mokutil --sb-state`` (a missing mokutil
    is a failed result); ``efi_present`` whether ``/sys/firmware/efi`` exists;
    ``efivar`` the base64 content of the SecureBoot EFI variable (``slurp``) when
    mokutil could not answer.
    """
    result = mokutil if isinstance(mokutil, Mapping) else {}
    text = "\n".join(str(result.get(k) or "") for k in ("stdout", "stderr", "msg"))
    if _SB_ENABLED.search(text):
        return "enabled"
    if _SB_DISABLED.search(text):
        return "disabled"
    if not efi_present or _NO_EFI.search(text):
        return "not-uefi"
    if efivar:
        try:
            raw = base64.b64decode(str(efivar), validate=True)
        except (binascii.Error, ValueError):
            return "unknown"
        if len(raw) == 5:
            return "enabled" if raw[4] == 1 else "disabled"
    return "unknown"


def _wrap(func):
    def filter_(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ValueError as exc:
            raise AnsibleFilterError(str(exc)) from exc
    filter_.__name__ = func.__name__
    filter_.__doc__ = func.__doc__
    return filter_


class FilterModule:
    """aphrodite.baremetal NVIDIA driver filters."""

    def filters(self) -> dict:
        return {
            "nvidia_driver_state": _wrap(driver_state),
            "nvidia_driver_packages": _wrap(driver_packages),
            "secure_boot_state": _wrap(secure_boot_state),
        }
