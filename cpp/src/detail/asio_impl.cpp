// Asio and Beast compiled once for the whole engine
// (BOOST_ASIO_SEPARATE_COMPILATION, BOOST_BEAST_SEPARATE_COMPILATION): the
// other translation units only include their headers.
#include <boost/asio/impl/src.hpp>
#include <boost/beast/src.hpp>
