async def main(context):
    return context.res.text('Hello, World!')
