fn main() {
    eprintln!("stagehand-nbd: not built yet");
    std::process::exit(2);
}
