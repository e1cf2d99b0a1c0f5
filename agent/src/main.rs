fn main() {
    eprintln!("stagehand-agent: not built yet");
    std::process::exit(2);
}
