# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # The docker_host option of every module that talks to the Docker engine (cmsg, broker, halb,
    # bundle, support_bundle, preflight); its one declaration is _docker.containers.DOCKER_HOST_OPTION.
    DOCUMENTATION = r"""
options:
  docker_host:
    description:
      - The Docker engine to talk to, for example V(unix:///var/run/docker.sock) or V(tcp://192.0.2.10:2376).
      - Defaults to E(DOCKER_HOST) or the local socket.
    type: str
"""
