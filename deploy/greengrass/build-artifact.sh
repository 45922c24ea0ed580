#!/bin/sh
# Zip this checkout as the Greengrass artifact (top folder `edge-collector/`) and print the
# upload command. Run from the repository root:  deploy/greengrass/build-artifact.sh [BUCKET]
set -eu
VERSION=$(sed -n 's/^ComponentVersion: "\(.*\)"/\1/p' deploy/greengrass/recipe.yaml)
OUT=${OUT:-build/greengrass}
STAGE="$OUT/stage/edge-collector"
rm -rf "$OUT" && mkdir -p "$STAGE"
cp -r pyproject.toml README.md collector sinks sample_data "$STAGE/"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
(cd "$OUT/stage" && python3 -m zipfile -c ../edge-collector.zip edge-collector)
echo "artifact: $OUT/edge-collector.zip (component version $VERSION)"
echo "upload:   aws s3 cp $OUT/edge-collector.zip s3://${1:-YOUR-BUCKET}/artifacts/com.example.EdgeCollector/$VERSION/edge-collector.zip"
