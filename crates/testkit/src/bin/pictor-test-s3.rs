//! `pictor-test-s3 BUCKET...`: the tests' S3-protocol server as a process, for scripts that run `pictor serve`
//! against S3 storage by hand (`scripts/load_fault.py --s3`). Prints one JSON object with the environment a
//! client needs (endpoint, keys, region), then serves until killed.

fn main() {
    let buckets: Vec<String> = std::env::args().skip(1).collect();
    if buckets.is_empty() {
        eprintln!("usage: pictor-test-s3 BUCKET...");
        std::process::exit(2);
    }
    let names: Vec<&str> = buckets.iter().map(String::as_str).collect();
    let server = pictor_testkit::S3Server::start(&names);
    let env: serde_json::Map<String, serde_json::Value> = server
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    println!("{}", serde_json::Value::Object(env));
    loop {
        std::thread::park();
    }
}
