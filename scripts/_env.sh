# Sourced by scripts/serve and scripts/test: a virtualenv in .venv with requirements.txt
# installed, reinstalled only when requirements.txt changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv with $("$PYTHON" --version)…"
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.requirements-$(sha256sum requirements.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "Installing requirements…"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
    rm -f .venv/.requirements-*
    touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"

# Development only (scripts/serve, scripts/manage): DATA_DIR, and a SECRET_KEY made once and
# kept there (readable by you only), so sessions and queued tasks survive a restart. Production
# sets its own (README, "Running in production").
use_development_secret_key() {
    export DATA_DIR="${DATA_DIR:-$PWD/var}"
    mkdir -p "$DATA_DIR"
    if [ -n "${SECRET_KEY:-}" ]; then
        return
    fi
    local secret_file="$DATA_DIR/secret_key"
    if [ ! -s "$secret_file" ]; then
        (umask 077 && python -c 'import secrets; print(secrets.token_urlsafe(50))' >"$secret_file.tmp")
        mv "$secret_file.tmp" "$secret_file"
    fi
    SECRET_KEY="$(cat "$secret_file")"
    export SECRET_KEY
}
