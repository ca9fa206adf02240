# Install rules (included from the top-level CMakeLists.txt): the public headers, libdevpipe.a,
# the devpipe program, a CMake package and a pkg-config file.
#
#   find_package(devpipe 0.1 REQUIRED)            target_link_libraries(app PRIVATE devpipe::devpipe)
#   c++ -std=c++20 app.cpp $(pkg-config --cflags --libs devpipe)
#
# The library is static, so a consumer links what it uses: oneDNN, OpenMP and threads (and the
# CUDA libraries when built with DEVPIPE_CUDA, MPI when built with it). devpipeConfig.cmake finds them with
# find_dependency; devpipe.pc lists them in Libs, since there is no shared devpipe to hide them.
include(CMakePackageConfigHelpers)

set(DEVPIPE_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/devpipe)
set(DEVPIPE_INSTALL_PKGCONFIGDIR ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

install(TARGETS devpipe EXPORT devpipeTargets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/devpipe ${PROJECT_BINARY_DIR}/include/devpipe
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} FILES_MATCHING PATTERN "*.h")
# The command-line program, when it was built (`cmake --build --target devpipe` builds only the
# library).
install(TARGETS devpipe_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} OPTIONAL)

install(EXPORT devpipeTargets NAMESPACE devpipe:: DESTINATION ${DEVPIPE_INSTALL_CMAKEDIR})
set(DEVPIPE_CONFIG_CUDA ${DEVPIPE_CUDA})
set(DEVPIPE_CONFIG_MPI ${DEVPIPE_WITH_MPI})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/devpipeConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/devpipeConfig.cmake
                              INSTALL_DESTINATION ${DEVPIPE_INSTALL_CMAKEDIR})
# 0.x: a minor release may change the API, so only the same major.minor is compatible.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/devpipeConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/devpipeConfig.cmake ${PROJECT_BINARY_DIR}/devpipeConfigVersion.cmake
        DESTINATION ${DEVPIPE_INSTALL_CMAKEDIR})

# ---- pkg-config. The prefix is found from the .pc file's own place (${pcfiledir}), so the
# file is right for `cmake --install --prefix <anywhere>`.
if(IS_ABSOLUTE "${DEVPIPE_INSTALL_PKGCONFIGDIR}")
  set(DEVPIPE_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  file(RELATIVE_PATH _devpipe_up "/${DEVPIPE_INSTALL_PKGCONFIGDIR}" "/")
  string(REGEX REPLACE "/$" "" _devpipe_up "${_devpipe_up}")
  set(DEVPIPE_PC_PREFIX "\${pcfiledir}/${_devpipe_up}")
endif()
foreach(_dir LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${_dir}}")
    set(DEVPIPE_PC_${_dir} "${CMAKE_INSTALL_${_dir}}")
  else()
    set(DEVPIPE_PC_${_dir} "\${prefix}/${CMAKE_INSTALL_${_dir}}")
  endif()
endforeach()
# What linking libdevpipe.a needs, as the build found it (a generator expression gives
# oneDNN's folder; cuda.cmake found the CUDA libraries).
set(DEVPIPE_PC_LIBS "-L$<TARGET_LINKER_FILE_DIR:DNNL::dnnl> -ldnnl ${OpenMP_CXX_FLAGS} -pthread")
if(DEVPIPE_WITH_MPI)
  foreach(_lib ${MPI_CXX_LIBRARIES})
    string(APPEND DEVPIPE_PC_LIBS " ${_lib}")
  endforeach()
endif()
if(DEVPIPE_CUDA)
  string(APPEND DEVPIPE_PC_LIBS " -L${CUDAToolkit_LIBRARY_DIR} -lcudart -lcublasLt"
         " ${DEVPIPE_CUDNN_LIBRARY} ${DEVPIPE_NCCL_LIBRARY}")
  set(DEVPIPE_PC_CFLAGS " -DDEVPIPE_HAVE_CUDA=1")
endif()
configure_file(${PROJECT_SOURCE_DIR}/cmake/devpipe.pc.in ${PROJECT_BINARY_DIR}/devpipe.pc.in @ONLY)
file(GENERATE OUTPUT ${PROJECT_BINARY_DIR}/devpipe.pc INPUT ${PROJECT_BINARY_DIR}/devpipe.pc.in)
install(FILES ${PROJECT_BINARY_DIR}/devpipe.pc DESTINATION ${DEVPIPE_INSTALL_PKGCONFIGDIR})
