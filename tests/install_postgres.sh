#!/usr/bin/env bash
# Installs what the PostgreSQL tests need on Debian 12, skipping what is there:
# PostgreSQL 15 with PL/Python and pg_cron, Debian's ODBC driver, Debian's chromium and
# chromium-driver (for the web page's browser tests), and pgvector, which
# Debian 12 does not package for PostgreSQL 15: it is built from Debian's own source
# package (trixie's), fetched through a temporary deb-src list.
set -euo pipefail
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
for pkg in postgresql-15 postgresql-plpython3-15 postgresql-15-cron postgresql-server-dev-15 \
           odbc-postgresql unixodbc unixodbc-dev build-essential dpkg-dev \
           chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if [ ! -f "$($PG_CONFIG --sharedir)/extension/vector.control" ]; then
  echo "building pgvector from Debian's source package"
  list=/etc/apt/sources.list.d/imgsim-trixie-src.list
  work=$(mktemp -d)
  trap '$SUDO rm -f "$list"; $SUDO apt-get update -qq || true; rm -rf "$work"' EXIT
  echo "deb-src http://deb.debian.org/debian trixie main" | $SUDO tee "$list" >/dev/null
  $SUDO apt-get update -qq
  (cd "$work" && apt-get source -qq --download-only pgvector && dpkg-source -x --skip-debianization pgvector_*.dsc src >/dev/null)
  make -s -C "$work/src" PG_CONFIG=$PG_CONFIG
  $SUDO make -s -C "$work/src" PG_CONFIG=$PG_CONFIG install
fi
echo "PostgreSQL 15, plpython3u, pg_cron, pgvector, odbc-postgresql and chromium are installed"
