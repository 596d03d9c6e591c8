module.exports = async (context) => context.res.text('Hello, World!');
