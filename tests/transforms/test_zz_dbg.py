import subprocess, sys
from pathlib import Path
import tests.transforms.test_infer_e2e as m

def test_dbg(tmp_path: Path) -> None:
    (tmp_path / "forest.joblib").write_bytes(b"not a model at all")
    m.labelled_readings(seed=12, per_device=20).select(
        "ts", "device", "metric", "value", "unit").write_parquet(tmp_path / "readings.parquet")
    config = tmp_path / "infer.yaml"
    config.write_text(m.CONFIG.format(data=tmp_path, model=tmp_path / "forest.joblib",
                                    endpoint="http://127.0.0.1:9"))
    try:
        subprocess.run([sys.executable, "-m", "collector", "run", str(config), "--once"],
            capture_output=True, text=True, cwd=m.ROOT, env={**m.aws_env(tmp_path), "COLUMNS": "250"}, timeout=20)
    except subprocess.TimeoutExpired as e:
        print((e.stderr or b"").decode()[-5000:])
    assert 0
