fn main() {
    eprintln!("coord: not built yet (issue: coordinator)");
    std::process::exit(2);
}
