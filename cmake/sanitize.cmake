# Sanitizer and fuzzer builds (included from the top-level CMakeLists.txt before any target;
# `make sanitize` and `make fuzz` configure their own build folders with these options).
#
#   -DDEVPIPE_SANITIZE=address,undefined   ASan + UBSan on every target (library, tests, CLI)
#   -DDEVPIPE_SANITIZE=thread              TSan
#   -DDEVPIPE_FUZZ=ON                      the libFuzzer harnesses in fuzz/ (clang only); every
#                                          target gets libFuzzer's coverage instrumentation
#                                          (-fsanitize=fuzzer-no-link), so that one ASan build
#                                          serves both the test suite and the fuzzers.
# UBSan halts on the first finding (-fno-sanitize-recover=all): a finding fails the run.
set(DEVPIPE_SANITIZE "" CACHE STRING "Sanitizers for every target, as -fsanitize= takes them (address,undefined or thread); empty: none")
option(DEVPIPE_FUZZ "Build the libFuzzer harnesses in fuzz/ (clang only)" OFF)

if(DEVPIPE_SANITIZE)
  add_compile_options(-fsanitize=${DEVPIPE_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer -g)
  add_link_options(-fsanitize=${DEVPIPE_SANITIZE})
endif()

if(DEVPIPE_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "DEVPIPE_FUZZ=ON needs clang (libFuzzer), got ${CMAKE_CXX_COMPILER_ID} "
                        "${CMAKE_CXX_COMPILER}: configure with -DCMAKE_CXX_COMPILER=clang++-14")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()
