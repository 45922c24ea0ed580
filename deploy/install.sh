#!/bin/sh
# Install edge-collector as a systemd service on this machine (run as root from the repo root):
#   sudo deploy/install.sh [path/to/config.yaml] [extras]
# - creates the system user `edge-collector` (in group dialout, for serial ports)
# - creates /opt/edge-collector/venv and pip-installs this checkout with the given extras
#   (default: aws,devices)
# - copies the config to /etc/edge-collector/config.yaml unless one is already there
# - installs and starts deploy/edge-collector.service
set -eu
CONFIG=${1:-sample_data/temp.yaml}
EXTRAS=${2:-aws,devices}
PREFIX=/opt/edge-collector

[ "$(id -u)" = 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }
[ -f pyproject.toml ] || { echo "run from the repository root" >&2; exit 1; }

id edge-collector >/dev/null 2>&1 || \
  useradd --system --home-dir /var/lib/edge-collector --shell /usr/sbin/nologin \
          --groups dialout edge-collector

python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip
"$PREFIX/venv/bin/pip" install -q ".[$EXTRAS]"
cp README.md "$PREFIX/README.md"

install -d -m 0755 /etc/edge-collector
if [ ! -f /etc/edge-collector/config.yaml ]; then
  install -m 0640 -g edge-collector "$CONFIG" /etc/edge-collector/config.yaml
fi
"$PREFIX/venv/bin/collector" check /etc/edge-collector/config.yaml

install -m 0644 deploy/edge-collector.service /etc/systemd/system/edge-collector.service
systemctl daemon-reload
systemctl enable --now edge-collector
systemctl --no-pager status edge-collector || true
