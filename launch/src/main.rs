fn main() {
    println!("fp8lm");
}
