"""Mammography imaging: format sniffing, metadata, decoding, preprocessing, synthetic exams."""
