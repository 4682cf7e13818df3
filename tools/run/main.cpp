// mmoc-run: executes a Plan (tools/run/run_main.cpp).
namespace mmoc::engine { int run_main(int argc, char** argv); }
int main(int argc, char** argv) { return mmoc::engine::run_main(argc, argv); }
