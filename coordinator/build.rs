//! With `ROCKSDB_LIB_DIR` set, librocksdb-sys links the system's RocksDB (Debian's
//! librocksdb-dev) instead of building its bundled copy, which takes ~22 minutes
//! here. `rocksdb_shim` then supplies the one C API symbol the crate references that
//! older system libraries lack.
fn main() {
    println!("cargo:rustc-check-cfg=cfg(system_rocksdb)");
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    if std::env::var_os("ROCKSDB_LIB_DIR").is_some() {
        println!("cargo:rustc-cfg=system_rocksdb");
    }
}
