fn main() {
    let args: Vec<String> = std::env::args().collect();
    let status = match args.get(1).map(String::as_str) {
        Some("install") => intercept_cni::install::install_main(&args[2..]),
        Some("uninstall") => intercept_cni::install::uninstall_main(&args[2..]),
        Some("doctor") => intercept_cni::host::doctor_main(&args[2..]),
        _ => 0,
    };
    std::process::exit(status);
}
