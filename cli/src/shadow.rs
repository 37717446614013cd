//! `blockrep shadow create`: provisions the standby's shadow LVs, tagged `blockrep_shadow`, with the size the
//! primary reported (recorded by `serve` when a sync found the shadow missing) or `--size`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lvmctl::{Lvm, SHADOW_TAG};

use crate::config::Config;
use crate::exit::{coded, USAGE};

/// File in a volume's standby state directory holding the source size the primary last reported.
const SOURCE_SIZE_FILE: &str = "source_size";

/// Records the source size the primary reported for a volume (best effort: only used by `shadow create`).
pub fn record_source_size(state_dir: &Path, size: u64) {
    let _ = std::fs::create_dir_all(state_dir);
    let _ = std::fs::write(state_dir.join(SOURCE_SIZE_FILE), size.to_string());
}

fn recorded_source_size(state_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(state_dir.join(SOURCE_SIZE_FILE)).ok()?.trim().parse().ok()
}

/// `/dev/VG/LV` → (VG, LV).
fn vg_lv(path: &Path) -> Option<(String, String)> {
    let mut parts = path.strip_prefix("/dev").ok()?.components();
    let vg = parts.next()?.as_os_str().to_str()?.to_owned();
    let lv = parts.next()?.as_os_str().to_str()?.to_owned();
    parts.next().is_none().then_some((vg, lv))
}

/// Creates the shadows of the named (or all) volumes.
pub fn create(cfg: &Config, names: &[String], size: Option<u64>) -> Result<()> {
    let lvm = Lvm::new().map_err(|e| coded(USAGE, e.to_string()))?;
    for vol in cfg.select(names)? {
        let shadow: &PathBuf = vol
            .shadow
            .as_ref()
            .ok_or_else(|| coded(USAGE, format!("volume {} has no `shadow` in {}", vol.name, cfg.path.display())))?;
        let (vg, lv) = vg_lv(shadow).ok_or_else(|| {
            coded(USAGE, format!("volume {}: shadow {} is not of the form /dev/VG/LV", vol.name, shadow.display()))
        })?;
        let want = size.or_else(|| recorded_source_size(&cfg.side_dir("standby", &vol.name))).ok_or_else(|| {
            coded(
                USAGE,
                format!(
                    "volume {}: the primary has not reported its size yet; pass --size, or run `blockrep sync {}` on \
                     the primary once (it is refused, and the size is recorded here)",
                    vol.name, vol.name
                ),
            )
        })?;
        match lvm.find_lv(&vg, &lv).with_context(|| format!("volume {}: cannot list LVs of {vg}", vol.name))? {
            Some(existing) if !existing.has_tag(SHADOW_TAG) => {
                return Err(coded(
                    USAGE,
                    format!(
                        "volume {}: LV {vg}/{lv} exists and is not a blockrep shadow (no tag {SHADOW_TAG}); \
                             not touching it",
                        vol.name
                    ),
                ));
            }
            Some(existing) if existing.size != want => {
                return Err(anyhow::anyhow!(
                    "volume {}: shadow {vg}/{lv} exists with {} bytes, the source has {want} bytes; resize it \
                     (lvresize -L {want}b {vg}/{lv}) or remove it and run this again",
                    vol.name,
                    existing.size
                ));
            }
            Some(_) => println!("volume {}: shadow {vg}/{lv} already exists ({want} bytes)", vol.name),
            None => {
                lvm.create_lv(&vg, &lv, want, &[SHADOW_TAG])
                    .with_context(|| format!("volume {}: cannot create shadow {vg}/{lv}", vol.name))?;
                println!("volume {}: created shadow {vg}/{lv} ({want} bytes, tag {SHADOW_TAG})", vol.name);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn shadow_paths_split_into_vg_and_lv() {
        assert_eq!(super::vg_lv("/dev/vg1/root_shadow".as_ref()), Some(("vg1".into(), "root_shadow".into())));
        assert_eq!(super::vg_lv("/srv/shadow.img".as_ref()), None);
        assert_eq!(super::vg_lv("/dev/mapper/x/y/z".as_ref()), None);
    }
}
